"""Training the default sCT model on phantoms generated on the fly."""
