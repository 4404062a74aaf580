"""Training stages: batch building (pure), DeepSpeed loops (per Ray Train worker), drivers."""
