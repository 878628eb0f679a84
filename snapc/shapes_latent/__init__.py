"""shapes-latent: the latent-space reference pipeline (autoencoder, latent UNet, text encoder)."""
