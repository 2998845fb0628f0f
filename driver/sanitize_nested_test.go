package driver

import (
	"fmt"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
)

// TestSanitizeNestedSecrets: Sanitize strips a csi_secret field at any
// depth, as it promises: in a message field and in a list of messages, not
// only at the top (every CSI 1.13 secret is a top-level map, but a message
// that nests one must not leak it into the logs). The messages are built
// at run time, with the csi_secret option on the inner field.
func TestSanitizeNestedSecrets(t *testing.T) {
	secret := &descriptorpb.FieldOptions{}
	proto.SetExtension(secret, csi.E_CsiSecret, true)
	opt := descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL.Enum()
	rep := descriptorpb.FieldDescriptorProto_LABEL_REPEATED.Enum()
	str := descriptorpb.FieldDescriptorProto_TYPE_STRING.Enum()
	msg := descriptorpb.FieldDescriptorProto_TYPE_MESSAGE.Enum()
	fdp := &descriptorpb.FileDescriptorProto{
		Name: proto.String("sanitizetest.proto"), Package: proto.String("sanitizetest"), Syntax: proto.String("proto3"),
		MessageType: []*descriptorpb.DescriptorProto{
			{Name: proto.String("Inner"), Field: []*descriptorpb.FieldDescriptorProto{
				{Name: proto.String("password"), JsonName: proto.String("password"), Number: proto.Int32(1), Label: opt, Type: str, Options: secret},
				{Name: proto.String("user"), JsonName: proto.String("user"), Number: proto.Int32(2), Label: opt, Type: str},
			}},
			{Name: proto.String("Outer"), Field: []*descriptorpb.FieldDescriptorProto{
				{Name: proto.String("inner"), JsonName: proto.String("inner"), Number: proto.Int32(1), Label: opt, Type: msg, TypeName: proto.String(".sanitizetest.Inner")},
				{Name: proto.String("list"), JsonName: proto.String("list"), Number: proto.Int32(2), Label: rep, Type: msg, TypeName: proto.String(".sanitizetest.Inner")},
			}},
		},
	}
	fd, err := protodesc.NewFile(fdp, nil)
	if err != nil {
		t.Fatal(err)
	}
	innerD, outerD := fd.Messages().ByName("Inner"), fd.Messages().ByName("Outer")
	inner := func(pw string) protoreflect.Message {
		m := dynamicpb.NewMessage(innerD)
		m.Set(innerD.Fields().ByName("password"), protoreflect.ValueOfString(pw))
		m.Set(innerD.Fields().ByName("user"), protoreflect.ValueOfString("alice"))
		return m
	}
	out := dynamicpb.NewMessage(outerD)
	out.Set(outerD.Fields().ByName("inner"), protoreflect.ValueOfMessage(inner("nested-hunter2")))
	l := out.Mutable(outerD.Fields().ByName("list")).List()
	l.Append(protoreflect.ValueOfMessage(inner("listed-hunter2")))

	s := fmt.Sprint(Sanitize(out))
	if strings.Contains(s, "hunter2") {
		t.Errorf("a nested secret survived Sanitize: %s", s)
	}
	if !strings.Contains(s, "alice") || !strings.Contains(s, stripped) {
		t.Errorf("Sanitize lost a non-secret field or did not mark the secret: %s", s)
	}
	if !strings.Contains(fmt.Sprint(out), "nested-hunter2") {
		t.Error("Sanitize changed the original message")
	}
}
