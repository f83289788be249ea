"""Mesh mTLS: the gateway's mesh certificate (from the config service), its renewal, the mesh CA bundle, the
listener's modes (strict, permissive, disabled) and the identity check on clusters with ``mesh_identity``."""
