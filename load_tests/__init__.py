"""Load tests for a running lowbit server: `loadgen.py` (asyncio, also `lowbit bench serve`) and
`locustfile.py` (the same scenario for locust)."""
