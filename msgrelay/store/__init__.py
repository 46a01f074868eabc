"""Storage backends behind one interface (`msgrelay.store.interface.IStore`)."""
