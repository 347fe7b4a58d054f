"""Safety and trust: moderation of harmful requests and offensive text (`lmforge moderate`),
measurements of what a model memorised, and filters on what it says."""
