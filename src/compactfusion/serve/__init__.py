"""``compactfusion serve``: a persistent parallel worker group behind an OpenAI-compatible images API.

Rank 0 runs the HTTP server (FastAPI + uvicorn, in a thread) and the scheduler; its main thread drives the
group: it broadcasts each admitted batch as a JSON control message (``comm.Communicator.broadcast_object``:
a length, then the bytes, each with a timeout), every rank runs the same pipeline call, and one
``all_gather_object`` afterwards carries each rank's status and byte counts back. Idle ranks receive a
heartbeat, so no rank waits longer than the collective timeout. Modules: ``schemas`` (request
validation), ``scheduler`` (bounded FIFO, batching, drain), ``engine`` (the pipeline on every rank),
``metrics`` (Prometheus), ``app`` (HTTP), ``worker`` (the per-rank loop), ``launcher`` (``--nproc``).
"""
