"""Safety and trust: measurements of what a model memorised, and filters on what it says."""
