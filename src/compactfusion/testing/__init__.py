"""Test fixtures: tiny random-weight diffusers pipelines built offline."""
