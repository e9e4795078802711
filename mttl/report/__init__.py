"""Reports of finished runs (`mttl report`): tables, pictures and routing analyses, never a model.

By job: `runs` reads run folders, `routing` their routing weights, `skills` checks routing
against the synthetic suite's primitives, `tables` the numbers and Markdown tables, `figures` the
PNG pictures, `build` writes the report folder. The command line is `mttl.cli.report`.
"""

from mttl.report.build import REPORT_MARKER, build_report

__all__ = ["REPORT_MARKER", "build_report"]
