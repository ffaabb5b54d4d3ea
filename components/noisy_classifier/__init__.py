"""The noise-conditional classifier f(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021)."""
