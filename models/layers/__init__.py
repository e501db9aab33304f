from .moe_conv import MoEConv2d, Routing, expert_groups
from .normalize import Normalize
from .router import LayerRouter, Router, hard_top1, selection_scores, top_k_gates

__all__ = ["MoEConv2d", "Routing", "expert_groups", "Normalize", "LayerRouter", "Router", "hard_top1",
           "selection_scores", "top_k_gates"]
