"""The sCT network, its manifest, input normalisation and the shipped default weights."""
