"""Everything that exists only for speed, switched on explicitly beside the reference
(model.py, cache.py, policies.py), which never imports it:

    import fast
    model = fast.enable(model)                      # fused projections, Triton kernels, the prompt's twin
    cache = fast.KVCache(cfg, policy, budget, ...)  # one free slot by argmax, one victim per step, prompt ranking
    step = fast.compile_decode(model, cache)        # compiled blocks, a CUDA graph on a GPU

    fast/model.py    the model's twins (fuse_linears, half_scores, Attention.prompt, Attention.forward_heads:
                     a decode step's new token into the cache and its attention in one kernel,
                     kernels.append_attention, or the new token alone, kernels.append_step; Block: a
                     decode step's projections with their norms and adds fused, kernels.linear_rows)
    fast/cache.py    the cache's twins (evict_one, LayerCache.append / append_attend, rank_prompt, write_prompt)
    fast/kernels.py  the Triton kernels and their torch twins
    fast/step.py     compile_decode (the blocks, the embedding and rotary angles), graph_decode, CudaGraphStep

Every ranking still goes through policies.priority, so a policy (built in or your own) keeps the
same tokens on either path; tests/test_fast.py holds every twin equal to the reference.
"""

from fast.cache import KVCache
from fast.model import enable
from fast.step import CudaGraphStep, compile_decode, graph_decode

__all__ = ["KVCache", "enable", "compile_decode", "graph_decode", "CudaGraphStep"]
