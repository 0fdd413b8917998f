"""The HTTP front: FastAPI, asyncio end to end, no torch."""
