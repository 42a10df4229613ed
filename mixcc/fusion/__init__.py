"""The torch.compile fusion pass: collective chains in a model become mixcc programs
(docs/DESIGN.md, "The fusion pass")."""

from .graph_pass import FusionPass, SiteReport, compile_model
from .op import clear as clear_compiled

__all__ = ["FusionPass", "SiteReport", "clear_compiled", "compile_model"]
