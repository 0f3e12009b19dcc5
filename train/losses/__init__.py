"""Loss modules that own their distributed communication; the math lives in kernels/."""
