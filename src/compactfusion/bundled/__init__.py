"""Models bundled with compactfusion (the digits model), outside the library core."""
