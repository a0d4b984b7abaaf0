"""Watching and finishing a run: its status over every shard (``status``), the live status a run on the
embedded database publishes (``live``), readiness for P&L (``verify``) and its HTML report (``report``).

Market coverage (status and verify) is ``models.coverage_summary`` of ``Store.market_fill_counts``: every
market of the universe classified by ``models.MarketStatus``, the one definition diagnose and plan share.
"""

from clobjob.monitor.live import (
                                  LIVE_MAX_AGE_S,
                                  LIVE_WAIT_S,
                                  NoLiveStatus,
                                  current_status,
                                  live_path,
                                  publish_live,
                                  read_live,
)
from clobjob.monitor.progress import ProgressMeter, Requests
from clobjob.monitor.report import render_report_html
from clobjob.monitor.status import (
                                  SCHEMA_VERSION,
                                  STOPPED_HINT,
                                  WIDTH,
                                  render_duration,
                                  render_progress,
                                  render_status,
                                  run_state,
                                  run_status,
                                  shard_state,
                                  shard_statuses,
                                  short_error,
)
from clobjob.monitor.verify import (
                                  coverage_by_month,
                                  cross_check,
                                  render_verify,
                                  report_sections,
                                  verify,
                                  worst_gaps,
)

__all__ = ["LIVE_MAX_AGE_S", "LIVE_WAIT_S", "SCHEMA_VERSION", "STOPPED_HINT", "WIDTH", "NoLiveStatus",
           "ProgressMeter", "Requests", "coverage_by_month", "cross_check", "current_status", "live_path",
           "publish_live", "read_live", "render_duration", "render_progress", "render_report_html", "render_status",
           "render_verify", "report_sections", "run_state", "run_status", "shard_state", "shard_statuses",
           "short_error", "verify", "worst_gaps"]
