"""Chat on top of generation (glm3.chat is the function): the conversation format and tool calls."""
