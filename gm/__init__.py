"""Generative models: image data, a convolutional VAE, a PatchGAN discriminator and their one trainer."""
