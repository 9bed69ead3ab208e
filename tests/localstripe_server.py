"""Runs the third-party localstripe server for the tests: `python -m tests.localstripe_server PORT`.

Its own `start()` binds every interface and pickles its state to a shared /tmp file; here
it binds 127.0.0.1 only and keeps its state in memory, so parallel runs cannot mix.
"""

import sys

from aiohttp import web
from localstripe import resources, server


def main() -> None:
    resources.Store.dump_to_disk = lambda self: None
    resources.Store.try_load_from_disk = lambda self: None
    web.run_app(server.app, host="127.0.0.1", port=int(sys.argv[1]), print=None)


if __name__ == "__main__":
    main()
