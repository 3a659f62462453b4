/// A value kept behind a reference, so that a table of them has small slots (a table sized for 50k entries has
/// 131,072, most of them empty).
final class Held<Value: Sendable>: Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}
