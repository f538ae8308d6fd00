"""autopar profiler: what each layer of a PyTorch model costs, as a `ModelProfile`.

    from profiler import profile, profile_zoo
    p = profile(model, example_inputs, device="meta")      # analytic: FLOPs, bytes, memory, graph, TP
    p = profile(model, example_inputs, device="cuda")      # measured: also per-layer and whole-step times
    p = profile_zoo("llama-70b", batch_size=1)             # a built-in model by name
"""

from profiler import zoo
from profiler.core import default_cache_dir, profile, profile_zoo
from profiler.errors import ProfileError
from profiler.graph import layer_graph
from profiler.hashing import structure_hash

__all__ = ["ProfileError", "default_cache_dir", "layer_graph", "profile", "profile_zoo", "structure_hash", "zoo"]
