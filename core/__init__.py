"""Models, losses and training building blocks of the SemFormer pipeline."""
