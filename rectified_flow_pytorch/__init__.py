"""Rectified flows in PyTorch for any ``nn.Module`` and any data shape (imports torch only)."""
from rectified_flow_pytorch import flow, solvers
from rectified_flow_pytorch.rectified_flow import RectifiedFlow, Reflow

__all__ = ['RectifiedFlow', 'Reflow', 'flow', 'solvers']
