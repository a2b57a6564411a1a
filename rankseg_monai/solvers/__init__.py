"""Pure-torch RankSEG solvers (no MONAI import).  Use :func:`rankseg_monai.functional.rankseg` as the entry."""
