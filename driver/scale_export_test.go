package driver

// NewSnapshotID is an ID CreateSnapshot could give a snapshot on this node,
// for tests that fill a store directly (scale_test.go).
func (d *Driver) NewSnapshotID() string {
	id, err := newID(snapshotPrefix, d.tag)
	if err != nil {
		panic(err)
	}
	return id
}
