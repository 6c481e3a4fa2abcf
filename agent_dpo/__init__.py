"""agent-dpo: turns a voice or tool-calling agent's live calls and user feedback into DPO/KTO
training data, trains a new policy per agent, evaluates it, and rolls it out by canary."""

__version__ = "0.1.0"
