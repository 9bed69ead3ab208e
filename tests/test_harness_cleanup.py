"""A test stack leaves nothing of its own behind: the reconciliation reports folder it makes
for each stack goes with it (before, every stack of every run left one in the temporary
directory: about ten thousand on the build machine after a few days), while a folder the
test passed in is the test's to keep."""

from pathlib import Path

from temporalio.client import Client

from adapters.db import Store
from starters.dev.stack import TemporalDevServer
from tests.harness import open_stack


async def test_the_reports_folder_a_stack_made_goes_with_it(
        store: Store, client: Client, temporal_server: TemporalDevServer, tmp_path: Path) -> None:
    made = await open_stack(store, client, temporal_server.address, worker=False)
    reports = made.settings.reports_dir
    assert reports is not None and reports.is_dir()
    (reports / "a-report.csv").write_text("run,breaks\n")
    passed = await open_stack(store, client, temporal_server.address, worker=False, reports_dir=tmp_path)
    await made.close()
    await passed.close()
    assert not reports.exists()
    assert tmp_path.is_dir()
