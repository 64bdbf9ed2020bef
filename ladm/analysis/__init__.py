"""The analysis shared by the methods: layer relevance R and ΔR, unit awareness Φ, general/specific splits, cached stages."""
