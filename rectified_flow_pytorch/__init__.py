"""Rectified flows and MeanFlows in PyTorch for any ``nn.Module`` and any data shape (imports torch only)."""
import sys

from rectified_flow_pytorch import flow_math, solvers
from rectified_flow_pytorch.mean_flow import ImprovedMeanFlow, MeanFlow, SplitMeanFlow
from rectified_flow_pytorch.rectified_flow import RectifiedFlow, Reflow

# The flow-math module's former name: ``from rectified_flow_pytorch import flow`` and ``rectified_flow_pytorch.flow``
# keep working for code written against it.
flow = flow_math
sys.modules.setdefault(__name__ + '.flow', flow_math)

__all__ = ['ImprovedMeanFlow', 'MeanFlow', 'RectifiedFlow', 'Reflow', 'SplitMeanFlow', 'flow_math', 'solvers']
