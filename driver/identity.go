package driver

import (
	"context"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// GetPluginInfo reports the driver name and version.
func (d *Driver) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: d.opt.Name, VendorVersion: d.opt.Version}, nil
}

// GetPluginCapabilities advertises the controller service, topology
// constraints (volumes and snapshots are local to their node), online
// expansion and, when the store supports them, the SnapshotMetadata and
// GroupController services.
func (d *Driver) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	svc := func(t csi.PluginCapability_Service_Type) *csi.PluginCapability {
		return &csi.PluginCapability{Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{Type: t}}}
	}
	caps := []*csi.PluginCapability{
		svc(csi.PluginCapability_Service_CONTROLLER_SERVICE),
		svc(csi.PluginCapability_Service_VOLUME_ACCESSIBILITY_CONSTRAINTS),
		svc(csi.PluginCapability_Service_SNAPSHOT_ACCESSIBILITY_CONSTRAINTS),
		{Type: &csi.PluginCapability_VolumeExpansion_{VolumeExpansion: &csi.PluginCapability_VolumeExpansion{
			Type: csi.PluginCapability_VolumeExpansion_ONLINE}}},
	}
	if _, ok := d.metadataStore(); ok {
		caps = append(caps, svc(csi.PluginCapability_Service_SNAPSHOT_METADATA_SERVICE))
	}
	if _, ok := d.groupStore(); ok {
		caps = append(caps, svc(csi.PluginCapability_Service_GROUP_CONTROLLER_SERVICE))
	}
	return &csi.GetPluginCapabilitiesResponse{Capabilities: caps}, nil
}

// Probe answers ready unless the store failed, except when it failed on an
// fsync (ErrSyncLost: ready, see below). The gRPC server
// starts listening only after the store has been opened and attached
// volumes recovered, so a reachable plugin with a working store is a ready
// one.
func (d *Driver) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	// Not ready once the store failed: the livenessprobe sidecar then
	// fails, and the restart it leads to reopens the store from its log.
	// Except after a failed fsync (ErrSyncLost): the store then refuses
	// to open until the node reboots, so a restarted plugin could serve
	// nothing, and every volume the fd holder keeps would hang, reads
	// included, with no way to unmount it. This process still serves
	// reads, unpublish and unstage, so the node can be drained; health
	// and the store-failed metric say what happened.
	err := d.opt.Store.Err()
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(err == nil || storeLost(err))}, nil
}
