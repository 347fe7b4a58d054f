"""Agents: a chat model that calls tools (plain Python functions) until it answers.

`tools.py` turns functions into OpenAI tool schemas and holds the built-in tools (calculator,
sandboxed Python, retrieval); `loop.py` runs the generate -> call -> read loop with a step limit
and a transcript.
"""
