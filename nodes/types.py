"""Names of the custom socket types the TADiSR nodes pass between each other."""

TADISR_MODEL = "TADISR_MODEL"          # nodes.model_cache.TADiSRHandle: a loaded model and its settings
TADISR_LATENTS = "TADISR_LATENTS"      # tadisr_core.pipeline.TiledLatents: tiles of one batch, per stage
TADISR_ATTENTION = "TADISR_ATTENTION"  # nodes.attention_view.CapturedAttention: per-tile "text" maps
