#pragma once
// Naming a private data member of a LibTorch class, for the few places where LibTorch keeps what we need out of
// reach (an archive's contents, a Sequential's list of calls). An explicit instantiation may name a private member
// ([temp.spec.general]/6); PrivateMember<Tag, &Class::member> defines member_of(Tag), which returns the member
// pointer. A Tag is a struct with `using type = T Class::*;` and a friend declaration of member_of(Tag).

namespace accelerated::detail {

template <class Tag, typename Tag::type Member>
struct PrivateMember {
  friend typename Tag::type member_of(Tag) { return Member; }
};

}  // namespace accelerated::detail
