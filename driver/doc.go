// Package driver implements the CSI Identity, Controller and Node services of
// csi-snap over two engines it does not own: a copy-on-write store (package
// cow, reached through the Store interface) and a kernel frontend that turns a
// store volume into a loop block device (package driver/kernel, reached
// through the Frontend interface).
//
// Volumes are local to the node that serves the call: every plugin runs the
// controller and node services together and creates volumes only on itself
// (topology segment TopologyKey = node ID).
//
// The store is the single source of truth: CSI names and creation parameters
// are kept in the cow objects' labels, which cow persists crash-safely with
// the object, so there is no second metadata file to keep in sync. Node state
// (what is staged where) is rediscovered from the frontend (attached devices)
// and the mount table, so it survives a restart of the process too.
//
// Errors: lower layers return sentinel errors (see errors.go); handlers turn
// them into gRPC codes in exactly one place, toStatus. Handlers validate their
// arguments first, then take a per-ID lock (contention answers Aborted), then
// act.
//
// Rollback in place (admin.go) is not a CSI call: the node plugin serves it
// on a local admin endpoint (Driver.AdminHandler, JSON over HTTP on a unix
// socket that cmd/csi-snap places in the run dir) for `csi-snap rollback`. It
// is refused while the frontend holds the volume (staged or published).
//
// # Caveats
//
//   - Names are stored as labels and looked up by scanning the store's listing
//     (O(volumes) per CreateVolume); fine for the tens to thousands of volumes
//     one node holds.
//   - Capacity is thin: volumes are sparse, GetCapacity reports the free bytes
//     of the data directory's filesystem, and CreateVolume does not reserve
//     space, so a node can be over-committed.
//   - Index memory and copy-out counters are exported only as far as the cow
//     Info structures expose them (allocated bytes per volume, COW bytes per
//     snapshot).
//   - The staged check of a rollback sees this node's frontend only; the
//     per-ID lock keeps a concurrent NodeStageVolume out while it runs
//     (it answers Aborted and kubelet retries).
package driver
