"""Results store -> tidy tables -> figures, Markdown/LaTeX tables and the reproduction report."""

from analyze.aggregate import Axis, Band, LossKind
from analyze.build import BuildOptions, build_all
from analyze.load import AnalysisStatus, ResultsSet, SkippedRun, load_results

__all__ = [
    "AnalysisStatus",
    "Axis",
    "Band",
    "BuildOptions",
    "LossKind",
    "ResultsSet",
    "SkippedRun",
    "build_all",
    "load_results",
]
