"""The query side: `cofeat serve` (HTTP API) and `cofeat search` (command line)."""
