"""Request body limits shared by every inbound endpoint of the relay."""

from fastapi import Request


async def read_limited(request: Request, limit: int) -> bytes | None:
    """Reads the body while counting, so a chunked body cannot bypass the limit; None when
    it is over."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
