package driver

// HoldLock takes the per-ID locks as an in-flight operation would, so
// external tests can check that contention answers Aborted. It panics if the
// keys are already held (a test bug).
func (d *Driver) HoldLock(keys ...string) (release func()) {
	if !d.locks.tryLock(keys...) {
		panic("HoldLock: keys already held")
	}
	return func() { d.locks.unlock(keys...) }
}

// StageMarker is the path of id's stage marker (stageMarker).
func (d *Driver) StageMarker(id string) string { return d.stageMarker(id) }

// StageRecords is the directory of id's stage records (stageRecords).
func (d *Driver) StageRecords(id string) string { return d.stageRecords(id) }

// StageRecord is the path of the record of id's stage at staging.
func (d *Driver) StageRecord(id, staging string) string { return d.stageRecord(id, staging) }

// TargetKey is the lock key of a publish target or staging path (targetKey).
func TargetKey(p string) string { return targetKey(p) }
