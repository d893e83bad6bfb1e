"""The model: timm construction, per-head views of attention weights, attention variants, MLP kinds."""
