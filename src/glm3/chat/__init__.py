"""Chat on top of generation: the conversation format and tool calls."""
