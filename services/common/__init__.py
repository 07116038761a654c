"""The shared runtime every Switchboard service boots through, used the same way by each."""
