"""gajax: gradient-based meta-learning in JAX, with gradient agreement as an optax transformation."""
