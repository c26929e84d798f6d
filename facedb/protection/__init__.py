"""Template protection: the keyring and file cipher, database encryption, cancellable templates."""
