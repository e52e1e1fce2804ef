//! Root filesystems from OCI layers: applying tar layers in order, with whiteouts, onto the
//! ext4 image being built, refusing anything that would escape the image.

pub mod identity;
pub mod layer_tar;
pub mod layers;
pub mod path;
