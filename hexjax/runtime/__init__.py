"""Execute a Plan on per-stage meshes."""
