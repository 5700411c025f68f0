"""The Jupyter dialect: Jupyter Server's kernel REST API and kernel WebSocket, and notebook runs."""
