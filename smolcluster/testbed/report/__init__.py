"""The run report: a run directory read back (load), its summary.json schema (summary), how the cluster
reacted to faults (reactions), the summary table and compare (tables), and plots (plots)."""

from smolcluster.testbed.report.load import RunData, load_run, node_rows
from smolcluster.testbed.report.plots import PLOTS_MISSING, plots_available, timeline_segments, write_compare_plot, write_plots
from smolcluster.testbed.report.reactions import describe_fault, fault_reactions
from smolcluster.testbed.report.summary import (ACCURACY_TARGETS, LinkSummary, NodeSummary, RunSummary, build_summary,
                                                read_summary, time_to_accuracy, write_summary)
from smolcluster.testbed.report.tables import compare, summary_table

__all__ = ["ACCURACY_TARGETS", "LinkSummary", "NodeSummary", "PLOTS_MISSING", "RunData", "RunSummary",
           "build_summary", "compare", "describe_fault", "fault_reactions", "load_run", "node_rows", "plots_available",
           "read_summary", "summary_table", "time_to_accuracy", "timeline_segments", "write_compare_plot", "write_plots",
           "write_summary"]
