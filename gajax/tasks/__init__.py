"""Task distributions: each samples a meta-batch of (support, query) pytrees with a leading task axis."""
