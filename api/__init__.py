"""kernel-bridge's HTTP face: one tornado Application, one handler module per dialect."""
