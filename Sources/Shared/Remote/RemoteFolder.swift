/// A folder behind a URL (a bucket prefix, a Hub repo): files are asked for by name; a missing
/// one answers 404. Nothing can be listed.
public struct RemoteFolder: FolderStorage {
    public let location: RemoteLocation
    public var root: String { location.display }

    public init(_ location: RemoteLocation) { self.location = location }

    public var isRemote: Bool { true }

    public func sub(_ relative: String) -> FolderStorage { RemoteFolder(location.appending(relative)) }

    /// The file `relative` names, refused if the name leaves the folder.
    private func file(_ relative: String) throws(RemoteError) -> RemoteLocation {
        guard RemoteLocation.staysInside(relative) else {
            throw RemoteError(.badURL(detail: "a file name in the checkpoint leaves its folder: \(relative)"), url: location.display)
        }
        return location.appending(relative)
    }

    public func exists(_ relative: String) throws -> Bool { try RemoteObject.openIfPresent(file(relative)) != nil }

    public func readWhole(_ relative: String, limit: Int) throws -> [UInt8] {
        try RemoteObject.open(file(relative)).readAll(limit: limit)
    }

    public func open(_ relative: String) throws -> MappedFile? {
        try RemoteObject.openIfPresent(file(relative)).map { try MappedFile(remote: $0) }
    }

    public func list(_ relative: String) -> [String]? { nil }

    public func countFiles(_ relative: String, atMost limit: Int, maxDepth: Int, matching: (String) -> Bool) -> Int? { nil }
}
