"""Synthetic paired data: sagittal T2FS spine MR, matching FDG PET, and PET/T2FS fusion SC series.

No patient data can be used here, so the demo, the tests and the shipped model's training all
draw on this phantom (docs/user-guide/research/phantom.md).
"""

from dicomnode.tools.fusion import OPACITY, SUV_WINDOW, hot_colormap, render_fusion
from dicomnode.tools.phantom.generate import CaseSpec, generate, plan_cases, simulate, write_case
from dicomnode.tools.phantom.writers import VENDORS, series_description
from dicomnode.tools.suv import suv_from_pet

__all__ = ["render_fusion", "hot_colormap", "SUV_WINDOW", "OPACITY", "generate", "plan_cases", "simulate",
           "write_case", "CaseSpec", "suv_from_pet", "VENDORS", "series_description"]
